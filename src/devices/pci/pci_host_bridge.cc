// PCI host bridge. Spec: PCI Local Bus 3.0 §6.1, appendix D.
#include "devices/pci/pci_host_bridge.h"

namespace keel::devices {

PciHostBridge::PciHostBridge()
    : config_(PciHeader{
          .vendor_id = kVendorId,
          .device_id = kDeviceId,
          .revision_id = 0,
          .class_code = 0x06,  // bridge device
          .subclass = 0x00,    // host bridge
          .prog_if = 0x00,
          .subsystem_vendor_id = kVendorId,
          .subsystem_id = 0,
          .interrupt_pin = InterruptPin::None,
      }) {}

}  // namespace keel::devices
