"""Forward-only schema migrations, one ``NNNN_name.sql`` file each, per store kind.

``postgres/`` and ``sqlite/`` hold the same logical schema in each dialect; :mod:`relay.store.migrations`
applies the files in version order, each once, and records it in ``schema_migrations``. A file that has
been released is never edited: a change is a new file with the next number.
"""
