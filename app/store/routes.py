from __future__ import annotations

from flask import Blueprint, render_template
from sqlalchemy import select

from app.extensions import db
from app.store.models import Product

bp = Blueprint("store", __name__, template_folder="templates")


@bp.get("/")
def catalog():
    products = db.session.scalars(select(Product).where(Product.active).order_by(Product.name)).all()
    return render_template("store/catalog.html", products=products)
