//! The SQL store of the controller: the Store trait and its SQLite implementation.
