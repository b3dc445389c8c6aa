//! `mesh`: the node agent and the operator CLI (all of it in the library, `lib.rs`).

fn main() -> anyhow::Result<()> {
    mesh_user::main()
}
