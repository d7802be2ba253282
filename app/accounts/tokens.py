"""Email-confirmation tokens: itsdangerous with their own salt and age limit (STYLE.md 12), so a
receipt or any other signed value can never pass as one."""
from __future__ import annotations

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.downloads.errors import InvalidInput

CONFIRM_SALT = "softgoods.email-confirm.v1"
CONFIRM_MAX_AGE = 3 * 24 * 3600  # seconds


def make_confirm_token(secret: str, user_id: int, email: str) -> str:
    return URLSafeTimedSerializer(secret, salt=CONFIRM_SALT).dumps([user_id, email])


def read_confirm_token(secret: str, token: str, max_age: int = CONFIRM_MAX_AGE) -> tuple[int, str]:
    serializer = URLSafeTimedSerializer(secret, salt=CONFIRM_SALT)
    try:
        user_id, email = serializer.loads(token, max_age=max_age)
        if not isinstance(user_id, int) or not isinstance(email, str):
            raise BadSignature("shape")
    except SignatureExpired:
        raise InvalidInput("this confirmation link has expired: log in and ask for a new one", status=410) from None
    except (BadSignature, ValueError, TypeError):
        raise InvalidInput("this confirmation link is not valid", status=404) from None
    return user_id, email
