# Reference Packer 1.6.6 HCL2 build of the smoke disk (scripts/make-smoke-disk.sh)
# with the qemu builder under TCG. Not used by the tool directly: it is the model
# for the Jinja2 template.
#
#   ssh-keygen -q -t ed25519 -N '' -C osimage-build -f WORK/id_ed25519
#   scripts/make-smoke-disk.sh WORK WORK/id_ed25519.pub
#   packer build -machine-readable \
#     -var disk=WORK/smoke.qcow2 \
#     -var disk_sha256=$(sha256sum WORK/smoke.qcow2 | cut -d' ' -f1) \
#     -var ssh_private_key_file=WORK/id_ed25519 \
#     -var output_directory=WORK/output \
#     scripts/smoke-example.pkr.hcl
#   qemu-img convert -O raw WORK/output/smoke.qcow2 WORK/disk.raw
#   debugfs -R 'cat /marker' 'WORK/disk.raw?offset=67108864'
#
# The data partition (p2, starting at byte 67108864) is mounted at /data in the
# guest, so /data/marker in the guest is /marker in debugfs.

variable "disk" {
  type        = string
  description = "path of the source qcow2 (from make-smoke-disk.sh)"
}

variable "disk_sha256" {
  type = string
}

variable "ssh_private_key_file" {
  type        = string
  description = "private half of the key whose .pub was baked into the disk"
}

variable "output_directory" {
  type = string
}

variable "marker_text" {
  type    = string
  default = "osimage smoke marker"
}

source "qemu" "smoke" {
  disk_image       = true
  iso_url          = var.disk
  iso_checksum     = "sha256:${var.disk_sha256}"
  use_backing_file = false
  skip_resize_disk = true # else the copy is resized to disk_size (40 GB default)
  format           = "qcow2"
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  accelerator      = "tcg"
  memory           = 256
  cpus             = 1
  headless         = true
  vnc_bind_address = "127.0.0.1"
  boot_wait        = "3s" # guest is up ~4 s after qemu starts (TCG); "0s" means the 10s default in 1.6.6

  # Packer's default is -netdev user,id=user.0,hostfwd=tcp::PORT-:22 (all
  # interfaces); its default -device is virtio-net,netdev=user.0, so keep the id.
  qemuargs = [
    ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
  ]

  communicator         = "ssh"
  ssh_host             = "127.0.0.1"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "2m"

  # busybox init runs /etc/rc.shutdown: kill all, sync, umount /data, power off.
  shutdown_command = "poweroff"
  shutdown_timeout = "1m"

  output_directory = var.output_directory
  vm_name          = "smoke.qcow2"
}

build {
  sources = ["source.qemu.smoke"]

  provisioner "shell" {
    inline = [
      "echo '${var.marker_text}' > /data/marker",
      "sync",
      "cat /data/marker",
    ]
  }
}
