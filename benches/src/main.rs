//! Placeholder binary; the demo / benchmark driver replaces it.

fn main() {
    eprintln!(
        "usage: vswitch-bench <not implemented yet>\n\
         The library crate `vswitch_bench` provides `frontend::Frontend` \
         (vhost-user virtio-net driver) and `frame` helpers."
    );
}
