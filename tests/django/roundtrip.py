"""Django's side of the round trip (tests/django.rs): files uploaded through a model's
FileField onto django-storages' S3 storage, and read back through the model once
relocator moved them, with the storage pointed at the new bucket.

    python roundtrip.py upload BUCKET   make the table (Django's own DDL), upload files
    python roundtrip.py check BUCKET    read every row's file through BUCKET's storage

Settings come from the environment: DATABASE_URL, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION. `check` prints one JSON line.
"""

import hashlib
import json
import os
import sys
from urllib.parse import unquote, urlparse

import django
from django.conf import settings


def configure(bucket):
    db = urlparse(os.environ["DATABASE_URL"])
    settings.configure(
        INSTALLED_APPS=["gallery"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": db.path.lstrip("/"),
                "USER": unquote(db.username or ""),
                "PASSWORD": unquote(db.password or ""),
                "HOST": db.hostname,
                "PORT": db.port,
            }
        },
        STORAGES={
            "default": {
                "BACKEND": "storages.backends.s3.S3Storage",
                "OPTIONS": {
                    "bucket_name": bucket,
                    "endpoint_url": os.environ["AWS_ENDPOINT_URL"],
                    "access_key": os.environ["AWS_ACCESS_KEY_ID"],
                    "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                    "region_name": os.environ["AWS_REGION"],
                    "addressing_style": "path",
                    "file_overwrite": False,
                    "querystring_auth": False,
                },
            },
        },
        USE_TZ=True,
    )
    django.setup()


# Names as users upload them: Django's storage cleans them (spaces become underscores),
# and the last fills the FileField's 100 characters, so its moved key does not fit.
NAMES = [f"photo-{i}.png" for i in range(12)] + [
    "holiday snap.jpg",
    "résumé.pdf",
    "a" * 90 + ".png",
]


def upload():
    from django.core.files.base import ContentFile
    from django.core.management import call_command

    from gallery.models import Photo

    call_command("migrate", run_syncdb=True, verbosity=0)
    for i, name in enumerate(NAMES):
        body = (f"{name}:{i}:" * (i * 97 + 1)).encode()
        Photo.objects.create(
            file=ContentFile(body, name=name), sha256=hashlib.sha256(body).hexdigest()
        )


def check():
    from gallery.models import Photo

    found = {"identical": [], "different": [], "unreadable": []}
    for photo in Photo.objects.order_by("id"):
        try:
            with photo.file.open("rb") as f:
                body = f.read()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            found["unreadable"].append(f"{photo.file.name}: {e}")
            continue
        same = hashlib.sha256(body).hexdigest() == photo.sha256
        found["identical" if same else "different"].append(photo.file.name)
    print(json.dumps(found))


if __name__ == "__main__":
    command, bucket = sys.argv[1], sys.argv[2]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    configure(bucket)
    {"upload": upload, "check": check}[command]()
