"""crowd-sync: key-population visit records from the HIS to the Sichuan health records platform."""

__version__ = "0.1.0"
