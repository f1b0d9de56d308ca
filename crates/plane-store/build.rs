//! Rebuilds the crate when a migration is added or edited: `sqlx::migrate!` embeds the
//! migration files at compile time, and cargo does not know it reads them.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
