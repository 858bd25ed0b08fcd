"""./build.py write-usb."""
