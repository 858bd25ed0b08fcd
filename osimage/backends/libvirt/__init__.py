"""backend: libvirt: the Packer libvirt plugin, a storage pool and a network; the hypervisor
connection, preflight, streams, ./build.py clean, and the native driver to come."""
