"""Built-in edgefleet plugins (one folder each: plugin.yaml + code) and workflow templates."""
