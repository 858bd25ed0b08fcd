"""The mirror: hashing what is published, publishing it (a local folder or SSH), checking
it before a build, fetching from it into the cache."""
