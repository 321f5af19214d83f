"""Value types shared by every part of Isthmus: names, identities, errors."""
