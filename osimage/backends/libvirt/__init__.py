"""backend: libvirt: the native driver (the default: osimage runs the domain, Packer provisions
it over SSH) or the Packer libvirt plugin (driver: plugin); a storage pool and a network; the
hypervisor connection, preflight, streams, ./build.py clean."""
