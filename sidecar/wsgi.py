"""gunicorn -c sidecar/gunicorn.conf.py --bind HOST:PORT sidecar.wsgi:app"""
from sidecar import create_sidecar

app = create_sidecar()
