"""The store: ``gunicorn --bind HOST:PORT wsgi:app``; also the app behind ``flask --app wsgi``."""
from app import create_app

app = create_app()
