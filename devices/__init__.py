"""Hardware: the one device and precision policy of the models (``devices.precision``)."""
