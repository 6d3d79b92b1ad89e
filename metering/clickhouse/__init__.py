"""ClickHouse access: the client factory, the migration runner and the SQL constants."""
