// PoolKit: a bounded connection pool and a libpq-backed PostgresConnection.
