"""Where artifacts and batch data live: local folders or S3-compatible object stores."""
