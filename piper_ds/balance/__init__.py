"""Expert load balancing across EP ranks: migrating experts between ranks (mover.py)."""
