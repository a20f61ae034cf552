"""REST blueprints, one per noun."""
