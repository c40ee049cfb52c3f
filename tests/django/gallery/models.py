from django.db import models


class Photo(models.Model):
    """A model as Django projects have it: a FileField (varchar(100) in the database,
    the key relative to the storage) and a digest of what was uploaded."""

    file = models.FileField(upload_to="image/")
    sha256 = models.CharField(max_length=64)

    class Meta:
        app_label = "gallery"
