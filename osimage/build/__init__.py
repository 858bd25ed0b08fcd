"""The pipeline: options and context, the step list and its assembly, the core steps, git
state and version, template rendering, Packer."""
