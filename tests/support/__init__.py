"""Helpers the tests share (importable as `support.<module>`: pytest puts tests/ on the path): paths of the
repository and the shared datasets (`paths`), the parametrized database fixture (`db`)."""
