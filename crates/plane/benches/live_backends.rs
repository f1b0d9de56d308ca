mod common;

fn main() {}
