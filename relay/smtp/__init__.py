"""Inbound SMTP: listeners (:mod:`relay.smtp.server`), sessions (:mod:`relay.smtp.session`), AUTH
(:mod:`relay.smtp.auth`), path parsing (:mod:`relay.smtp.address`) and the DATA reader
(:mod:`relay.smtp.data`)."""
