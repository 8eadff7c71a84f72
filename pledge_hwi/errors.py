"""What can go wrong with a hardware wallet, in the kernel's error vocabulary.

HWI's (and USB's) exceptions are translated into these at the device's edge
(`pledge_hwi.device.translate_hwi_error`), so the CLI prints one sentence instead of a
device library's traceback. They subclass `pledge.errors` types, like the bank signer's
errors, without importing the bank's signer.
"""

from __future__ import annotations

from pledge.errors import CustodyError, InvalidInput, UpstreamUnavailable

__all__ = ["DeviceBusy", "DeviceError", "DeviceRefused", "DeviceUnavailable"]


class DeviceError(CustodyError):
    """Base of every device failure; on its own it means an unexpected fault."""

    status_code = 500
    code = "device_error"


class DeviceRefused(DeviceError, InvalidInput):
    """The device (or the person at it) will not do this; retrying will not help."""

    status_code = 422
    code = "device_refused"


class DeviceUnavailable(DeviceError, UpstreamUnavailable):
    """No usable device: unplugged, locked, several connected, no permission."""

    status_code = 503
    code = "device_unavailable"


class DeviceBusy(DeviceError, UpstreamUnavailable):
    """The device is busy with another request; retry soon."""

    status_code = 503
    code = "device_busy"
