"""absl flag definitions (definitions.py) and flagfile presets (*.cfg).

Import as `from flags import definitions`; never `import flags` bare, which
would shadow absl's `flags` module in readers' minds.
"""
