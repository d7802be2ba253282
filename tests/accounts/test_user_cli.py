"""``softgoods user add``: the owner's way to create accounts; one-line refusals, nothing written."""
import pytest
from sqlalchemy import func, select

from app.accounts.models import User
from app.extensions import db


def count_users(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(User))


def test_user_add_with_password_on_stdin_can_log_in(app, runner, client):
    result = runner.invoke(args=["softgoods", "user", "add", "--email", "Owner@Example.com", "--role", "owner",
                                 "--password-stdin"], input="correct horse\n")
    assert result.exit_code == 0 and "owner owner@example.com added" in result.output
    page = client.post("/account/login", data={"email": "owner@example.com", "password": "correct horse"})
    assert page.status_code == 303
    assert client.get("/admin/").status_code == 200


@pytest.mark.parametrize("args, stdin, reason", [
    (["--email", "nope"], "correct horse\n", "not a valid email address"),
    (["--email", "a@example.com"], "short\n", "at least 8 characters"),
    (["--email", "a@example.com", "--role", "king"], "correct horse\n", "'king' is not one of"),
])
def test_user_add_refuses_with_one_line(app, runner, args, stdin, reason):
    result = runner.invoke(args=["softgoods", "user", "add", *args, "--password-stdin"], input=stdin)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and reason in lines[0], result.output
    assert count_users(app) == 0
