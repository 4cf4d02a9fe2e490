"""One router per API area; app.py includes them."""
