"""The built-in guard layers, one module each, registered through the plugin hook."""
