-- Our build identity. version() answers '0.2.0' for PgQue API compatibility (0.2 clients
-- read it; the 0.3 functions are additions they never call); the schema
-- comment says which implementation is installed, and marks the schema as ours for the
-- foreign-install guard in 00_objects.sql.
COMMENT ON SCHEMA pgque IS 'sqlalchemy-pgque engine 0.2.0 (PgQue 0.2 API, with the PgQue 0.3 functions)';
