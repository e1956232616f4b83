// The DSDT: the namespace of a Keel PC in AML. Spec: ACPI 6.4 sections
// 5.2.11.1 (DSDT), 6.1.5 (_HID), 6.1.2 (_CID), 6.1.12 (_UID), 6.2.2 (_CRS),
// 6.5.5 (_BBN), 6.5.6 (_SEG), 6.2.13 (_PRT), 7.4.2 (\_Sx system states);
// PCI Firmware Specification 3.2 section 4.1.2 (the ECAM range reserved by
// a PNP0C02 motherboard resource device).
// Implemented:
//   \_SB.PCI0  PCIe host bridge: bus numbers, config ports 0xcf8-0xcff, the
//              I/O, 32-bit and 64-bit BAR windows, _PRT for 32 slots x 4 pins
//   \_SB.MRES  PNP0C02 motherboard resources: the ECAM range, so Linux
//              trusts the MCFG region
//   \_SB.COM1  PNP0501 16550 UART
//   \_SB.PWRB  PNP0C0C power button (section 4.8.3.1.2), notified 0x80 by:
//   \_SB.GED0  ACPI0013 Generic Event Device (section 5.6.9): on its
//              edge-triggered GSI, _EVT reads the 32-bit event register
//              ESEL (the device clears it on read) and notifies PWRB when
//              kGedEventPowerButton is set. Hardware-reduced ACPI has no
//              fixed power button event, so this is how one reaches Linux
//              (drivers/acpi/evged.c, then the button driver).
//              kGedEventPciHotplug calls \_SB.PCI0.PCNT.
//   \_SB.PCI0.Sxx  ACPI PCI hotplug slots 1-31 (the scheme of QEMU's
//              acpi-pci-hotplug, which Linux's acpiphp serves): _ADR, _SUN
//              (section 6.1.12) and _EJ0 (section 6.3.3), which writes the
//              slot's bit to B0EJ; PCNT reads PCIU and PCID from the
//              register block (src/devices/pci_hotplug.h) and notifies each
//              slot named: Device Check (1) for an insertion, Eject Request
//              (3) for a removal (section 5.6.6).
//   \_SB.PEVT  QEMU0001 pvpanic: one I/O port Linux's pvpanic-mmio
//              driver writes when the guest panics
//   \_S5       soft-off, the SLP_TYP for the FADT's sleep control register
// Missing: processor objects, _OSC, the RTC and i8042 as namespace
// devices (Linux finds them without).
#include <fmt/format.h>

#include "boot/acpi/aml.h"
#include "boot/acpi/tables.h"

namespace keel::boot::acpi {
namespace {

using aml::Cacheability;
using aml::MemoryAccess;
using aml::ResourceTemplate;
using aml::ResourceUsage;

constexpr uint32_t kPciSlotCount = 32;
constexpr uint32_t kPciPinCount = 4;
constexpr uint64_t kEcamBusSize = 1 << 20;  // 32 devices x 8 functions x 4 KiB
constexpr uint16_t kPciConfigPort = 0xcf8;  // CONFIG_ADDRESS 0xcf8, CONFIG_DATA 0xcfc
constexpr uint8_t kPciConfigPortCount = 8;
constexpr uint8_t kCom1PortCount = 8;

Bytes pci_host_crs(const PciHostConfig& pci) {
  ResourceTemplate crs;
  // The bridge produces (decodes and forwards) each window below; the
  // config ports it consumes itself (section 6.4.3.5, Consumer/Producer).
  crs.word_bus_number(ResourceUsage::Producer, 0, pci.bus_end);
  crs.io(kPciConfigPort, kPciConfigPort, 1, kPciConfigPortCount);
  if (pci.io_size > 0) {
    crs.word_io(ResourceUsage::Producer, pci.io_base,
                static_cast<uint16_t>(pci.io_base + pci.io_size - 1));
  }
  crs.dword_memory(ResourceUsage::Producer, Cacheability::NonCacheable, MemoryAccess::ReadWrite,
                   static_cast<uint32_t>(pci.mmio32_base),
                   static_cast<uint32_t>(pci.mmio32_base + pci.mmio32_size - 1));
  if (pci.mmio64_size > 0) {
    // Cacheable rather than Prefetchable: Linux places only prefetchable
    // BARs in a prefetchable window, but any memory BAR in this one.
    crs.qword_memory(ResourceUsage::Producer, Cacheability::Cacheable, MemoryAccess::ReadWrite,
                     pci.mmio64_base, pci.mmio64_base + pci.mmio64_size - 1);
  }
  return crs.to_buffer();
}

// _PRT (section 6.2.13): one entry per slot and pin, each a package of
// {Address, Pin, Source, Source Index}. Address is the device in the high
// word with 0xffff for "any function"; a Source of 0 makes Source Index a
// GSI, so no link devices are needed.
Bytes pci_routing_table() {
  std::vector<Bytes> routes;
  routes.reserve(kPciSlotCount * kPciPinCount);
  for (uint32_t slot = 0; slot < kPciSlotCount; ++slot) {
    for (uint32_t pin = 0; pin < kPciPinCount; ++pin) {
      routes.push_back(
          aml::package({aml::integer((uint64_t{slot} << 16) | 0xffff), aml::integer(pin),
                        aml::integer(0), aml::integer(pci_intx_gsi(slot, pin))}));
    }
  }
  return aml::package(routes);
}

Bytes motherboard_crs(const AcpiConfig& config) {
  const PciHostConfig& pci = config.pci;
  uint64_t size = (uint64_t{pci.bus_end} + 1) * kEcamBusSize;
  ResourceTemplate crs;
  // The GED's and the hotplug registers: nothing may put a BAR there.
  if (config.ged_address != 0) {
    crs.memory32_fixed(MemoryAccess::ReadWrite, static_cast<uint32_t>(config.ged_address),
                       static_cast<uint32_t>(kGedRegisterBytes));
  }
  if (config.pci_hotplug_address != 0) {
    crs.memory32_fixed(MemoryAccess::ReadWrite, static_cast<uint32_t>(config.pci_hotplug_address),
                       static_cast<uint32_t>(kPciHotplugRegisterBytes));
  }
  if (pci.ecam_base + size <= (uint64_t{1} << 32)) {
    crs.memory32_fixed(MemoryAccess::ReadWrite, static_cast<uint32_t>(pci.ecam_base),
                       static_cast<uint32_t>(size));
  } else {
    crs.qword_memory(ResourceUsage::Consumer, Cacheability::NonCacheable, MemoryAccess::ReadWrite,
                     pci.ecam_base, pci.ecam_base + size - 1);
  }
  return crs.to_buffer();
}

Bytes com1_crs(const AcpiConfig& config) {
  ResourceTemplate crs;
  crs.io(config.com1_port, config.com1_port, 1, kCom1PortCount);
  crs.irq_no_flags(static_cast<uint8_t>(config.com1_irq));
  return crs.to_buffer();
}

std::string slot_name(uint32_t slot) { return fmt::format("S{:02X}", slot); }

// The hotplug register block and the slot objects inside \_SB.PCI0 (see
// the top of the file). Slot 0 is the host bridge, never plugged.
std::vector<Bytes> pci_hotplug_objects(const AcpiConfig& config) {
  using aml::FieldAccess;
  using aml::FieldUpdate;
  using aml::integer;
  using aml::local;
  using aml::name;
  using aml::reference;
  std::vector<Bytes> objects;
  objects.push_back(aml::operation_region("PCST", aml::RegionSpace::SystemMemory,
                                          config.pci_hotplug_address, kPciHotplugRegisterBytes));
  objects.push_back(aml::field("PCST", FieldAccess::DWord, FieldUpdate::WriteAsZeros,
                               {{"PCIU", 32}, {"PCID", 32}, {"B0EJ", 32}}));
  std::vector<Bytes> notifications = {
      aml::store(reference("PCIU"), local(0)),
      aml::store(reference("PCID"), local(1)),
  };
  for (uint32_t slot = 1; slot < kPciSlotCount; ++slot) {
    const uint64_t bit = uint64_t{1} << slot;
    const std::string slot_object = slot_name(slot);
    // clang-format off
    objects.push_back(aml::device(slot_object, {
        name("_ADR", integer(uint64_t{slot} << 16)),
        name("_SUN", integer(slot)),
        // Method(_EJ0, 1) { B0EJ = bit }: the guest let the device go.
        aml::method("_EJ0", 1, aml::MethodSerialization::NotSerialized, {
            aml::store(integer(bit), reference("B0EJ")),
        }),
    }));
    notifications.push_back(aml::if_then(aml::bitwise_and(local(0), integer(bit)), {
        aml::notify(reference(slot_object), integer(1)),  // Device Check
    }));
    notifications.push_back(aml::if_then(aml::bitwise_and(local(1), integer(bit)), {
        aml::notify(reference(slot_object), integer(3)),  // Eject Request
    }));
    // clang-format on
  }
  objects.push_back(
      aml::method("PCNT", 0, aml::MethodSerialization::Serialized, notifications));
  return objects;
}

// \_SB.PWRB and \_SB.GED0 (see the top of the file).
std::vector<Bytes> power_button_devices(const AcpiConfig& config) {
  using aml::FieldAccess;
  using aml::FieldUpdate;
  using aml::integer;
  using aml::name;
  ResourceTemplate crs;
  crs.interrupt(aml::InterruptTrigger::Edge, aml::InterruptPolarity::ActiveHigh,
                aml::InterruptSharing::Exclusive, config.ged_gsi);
  // clang-format off
  std::vector<Bytes> evt = {
      aml::store(aml::reference("ESEL"), aml::local(0)),
      aml::if_then(aml::bitwise_and(aml::local(0), integer(kGedEventPowerButton)), {
          // 0x80: "the power button was pressed" (section 5.6.6, table 5.168).
          aml::notify(aml::reference("\\_SB.PWRB"), integer(0x80)),
      }),
  };
  if (config.pci_hotplug_address != 0) {
    evt.push_back(aml::if_then(aml::bitwise_and(aml::local(0), integer(kGedEventPciHotplug)), {
        aml::reference("\\_SB.PCI0.PCNT"),  // a method call: PCNT takes no arguments
    }));
  }
  Bytes power_button = aml::device("PWRB", {
      name("_HID", integer(aml::eisa_id("PNP0C0C"))),
      name("_UID", integer(0)),
  });
  Bytes ged = aml::device("GED0", {
      name("_HID", aml::string("ACPI0013")),
      name("_UID", integer(0)),
      name("_CRS", crs.to_buffer()),
      aml::operation_region("EREG", aml::RegionSpace::SystemMemory, config.ged_address,
                            kGedRegisterBytes),
      aml::field("EREG", FieldAccess::DWord, FieldUpdate::WriteAsZeros, {{"ESEL", 32}}),
      // Method(_EVT, 1, Serialized) {
      //   Local0 = ESEL
      //   If (Local0 & kGedEventPowerButton) { Notify(\_SB.PWRB, 0x80) }
      //   If (Local0 & kGedEventPciHotplug) { \_SB.PCI0.PCNT() }
      // }
      aml::method("_EVT", 1, aml::MethodSerialization::Serialized, evt),
  });
  // clang-format on
  return {power_button, ged};
}

Bytes pvpanic_device(const AcpiConfig& config) {
  ResourceTemplate crs;
  crs.io(config.pvpanic_port, config.pvpanic_port, 1, 1);
  // clang-format off
  return aml::device("PEVT", {
      aml::name("_HID", aml::string("QEMU0001")),
      aml::name("_UID", aml::integer(0)),
      aml::name("_CRS", crs.to_buffer()),
  });
  // clang-format on
}

}  // namespace

Bytes build_dsdt(const AcpiConfig& config) {
  using aml::device;
  using aml::eisa_id;
  using aml::integer;
  using aml::name;

  // One object per line, as in the ASL this encodes.
  // clang-format off
  std::vector<Bytes> pci0_objects = {
      name("_HID", integer(eisa_id("PNP0A08"))),  // PCI Express root bridge
      name("_CID", integer(eisa_id("PNP0A03"))),  // compatible: PCI root bridge
      name("_SEG", integer(0)),
      name("_BBN", integer(0)),
      name("_UID", integer(0)),
      name("_CRS", pci_host_crs(config.pci)),
      name("_PRT", pci_routing_table()),
  };
  // clang-format on
  if (config.pci_hotplug_address != 0) {
    for (Bytes& object : pci_hotplug_objects(config)) pci0_objects.push_back(std::move(object));
  }
  Bytes pci0 = device("PCI0", pci0_objects);
  // clang-format off
  Bytes motherboard_resources = device("MRES", {
      name("_HID", integer(eisa_id("PNP0C02"))),
      name("_UID", integer(0)),
      name("_CRS", motherboard_crs(config)),
  });
  Bytes com1 = device("COM1", {
      name("_HID", integer(eisa_id("PNP0501"))),  // 16550A-compatible UART
      name("_UID", integer(1)),
      name("_CRS", com1_crs(config)),
  });
  // clang-format on
  // \_S5 (section 7.4.2): {SLP_TYPa, SLP_TYPb}; a hardware-reduced platform
  // uses only the first, written to SLEEP_CONTROL_REG.
  Bytes s5 = name("\\_S5", aml::package({integer(config.s5_sleep_type), integer(0)}));

  SdtBuilder table("DSDT", kDsdtRevision);
  std::vector<Bytes> system_bus = {pci0, motherboard_resources, com1};
  if (config.ged_address != 0) {
    for (Bytes& device : power_button_devices(config)) system_bus.push_back(std::move(device));
  }
  if (config.pvpanic_port != 0) system_bus.push_back(pvpanic_device(config));
  table.writer().append(aml::scope("\\_SB", system_bus));
  table.writer().append(s5);
  return std::move(table).finish();
}

}  // namespace keel::boot::acpi
