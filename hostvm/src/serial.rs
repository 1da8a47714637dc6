//! COM1: vm-superio's 16550 UART on ports 0x3f8-0x3ff, interrupting through a KVM irqfd.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The UART's interrupt line: an eventfd registered as an irqfd (or nothing, for guests
/// without an irqchip).
pub(crate) struct IrqLine(pub Option<EventFd>);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        match &self.0 {
            Some(e) => e.write(1),
            None => Ok(()),
        }
    }
}

/// COM1 with its output sink (stdout or a file).
pub(crate) struct Com1(Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>);

impl Com1 {
    pub(crate) fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Com1 {
        Com1(Serial::new(irq, out))
    }

    /// A port write at `offset` (0-7) from the base.
    pub(crate) fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.0.write(offset, value) {
            tracing::debug!("serial write: {e:?}");
        }
        if offset == 0 {
            // Line-buffered output would hide a guest that dies mid-line.
            let _ = self.0.writer_mut().flush();
        }
    }

    /// A port read at `offset` (0-7).
    pub(crate) fn read(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }
}
