"""IMMUNE's built-in modules.

Each module here is a plugin registered through the ``immune.plugins`` entry
point group, exactly as a third-party plugin is; nothing in the core imports
them directly.
"""
