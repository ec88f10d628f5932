"""The HTTP edge: parse, authorise, call a service, map domain errors to problem documents."""
