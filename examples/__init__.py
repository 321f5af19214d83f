"""Example applications run on the Isthmus mesh."""
