"""io: read and write images with their geometry, the dataset layout and its checks, versioned artifacts. No torch here."""
