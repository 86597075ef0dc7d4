"""A model module that raises when imported."""
raise ValueError("this module cannot be imported")
