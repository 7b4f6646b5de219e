"""QA beside the station: the people who look at what the station rejected, and what they sign.

- ``users``: review users in ``STORE/review.sqlite`` (roles, passwords, lockout, unlock), every change audited;
- ``audit``: the review database and its hash-chained audit trail (user rows, review columns, refused logins);
- ``review``: the review queue, signed reviews, trends, the export of reviewed units as a dataset;
- ``review_app``: the Gradio review app (needs the ``review`` extra; imported only when the app is served);
- ``login_limit``: the rate limit of failed logins in the review app;
- ``promotion``: signed model promotions and rollbacks in the registry, bound to one user database.

The station's runtime (sources, pipeline, store, line output, challenge, station) imports nothing from here: a line
machine runs without it. This package may import what :mod:`vialinspect.inspection_station` may, and the
station's own modules (the record store it reviews)."""
