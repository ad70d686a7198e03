"""Ray Serve deployments and the application builder; they wire app/ to Ray."""
