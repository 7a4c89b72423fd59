"""The Kubernetes backend's pure parts: settings and the renderers of its objects."""
