"""The energy ledger: one row per request, the models it tried, and each device's idle energy.

`schema` declares the tables (SQLModel), `store` opens a database and migrates it, `writer`
moves rows from the request path to the database on a background thread.
"""
