#include "devices/serial.h"

#include <fmt/format.h>

namespace keel::devices {
namespace {

constexpr uint64_t kData = 0;       // RBR / THR, DLL with DLAB
constexpr uint64_t kIer = 1;        // DLM with DLAB
constexpr uint64_t kIirFcr = 2;
constexpr uint64_t kLcr = 3;
constexpr uint64_t kMcr = 4;
constexpr uint64_t kLsr = 5;
constexpr uint64_t kMsr = 6;
constexpr uint64_t kScr = 7;

constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kIerRxData = 0x01;
constexpr uint8_t kIerThrEmpty = 0x02;
constexpr uint8_t kIirNone = 0x01;
constexpr uint8_t kIirThrEmpty = 0x02;
constexpr uint8_t kIirRxData = 0x04;
constexpr uint8_t kIirFifoEnabled = 0xc0;
constexpr uint8_t kFcrEnable = 0x01;
constexpr uint8_t kFcrClearRx = 0x02;
constexpr uint8_t kMcrLoop = 0x10;
constexpr uint8_t kMcrOut2 = 0x08;
constexpr uint8_t kLsrDataReady = 0x01;
constexpr uint8_t kLsrThrEmpty = 0x20;
constexpr uint8_t kLsrIdle = 0x40;
constexpr size_t kFifoBytes = 64;
constexpr size_t kMaxQueuedInput = 64 * 1024;

}  // namespace

void Serial::read(uint64_t offset, std::span<std::byte> data) {
  if (data.empty()) return;
  uint8_t value = 0xff;
  if (offset < 8) value = read_register(offset);
  data[0] = std::byte{value};
  for (size_t i = 1; i < data.size(); ++i) data[i] = std::byte{0xff};
}

void Serial::write(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty() || offset >= 8) return;
  write_register(offset, static_cast<uint8_t>(data[0]));
}

uint8_t Serial::read_register(uint64_t offset) {
  std::unique_lock lock(mutex_);
  uint8_t value = 0;
  switch (offset) {
    case kData:
      if (lcr_ & kLcrDlab) {
        value = dll_;
      } else if (!input_.empty()) {
        value = input_.front();
        input_.pop_front();
      }
      break;
    case kIer: value = (lcr_ & kLcrDlab) ? dlm_ : ier_; break;
    case kIirFcr:
      value = interrupt_identification();
      // Reading IIR while it reports THR-empty clears that source.
      if ((value & 0x0f) == kIirThrEmpty) thr_empty_pending_ = false;
      if (fcr_ & kFcrEnable) value |= kIirFifoEnabled;
      break;
    case kLcr: value = lcr_; break;
    case kMcr: value = mcr_; break;
    case kLsr:
      value = kLsrThrEmpty | kLsrIdle;
      if (!input_.empty()) value |= kLsrDataReady;
      break;
    case kMsr:
      if (mcr_ & kMcrLoop) {
        // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (datasheet 8.6).
        value = static_cast<uint8_t>(((mcr_ & 0x01) << 5) | ((mcr_ & 0x02) << 3) |
                                     ((mcr_ & 0x04) << 4) | ((mcr_ & 0x08) << 4));
      } else {
        value = msr_;
      }
      break;
    case kScr: value = scr_; break;
    default: value = 0xff; break;
  }
  lock.unlock();
  update_interrupt();
  return value;
}

void Serial::write_register(uint64_t offset, uint8_t value) {
  std::unique_lock lock(mutex_);
  bool transmit = false;
  switch (offset) {
    case kData:
      if (lcr_ & kLcrDlab) {
        dll_ = value;
      } else if (mcr_ & kMcrLoop) {
        if (input_.size() < kFifoBytes) input_.push_back(value);
        thr_empty_pending_ = true;
      } else {
        transmit = true;
        thr_empty_pending_ = true;
      }
      break;
    case kIer:
      if (lcr_ & kLcrDlab) {
        dlm_ = value;
      } else {
        // Enabling the THR-empty interrupt raises it at once: the THR is empty.
        if ((value & kIerThrEmpty) && !(ier_ & kIerThrEmpty)) thr_empty_pending_ = true;
        ier_ = value & 0x0f;
      }
      break;
    case kIirFcr:
      fcr_ = value;
      if (value & kFcrClearRx) input_.clear();
      break;
    case kLcr: lcr_ = value; break;
    case kMcr: mcr_ = value & 0x1f; break;
    case kScr: scr_ = value; break;
    default: break;  // LSR and MSR are read-only
  }
  lock.unlock();
  if (transmit) {
    std::byte byte{value};
    output_(std::span<const std::byte>(&byte, 1));
  }
  update_interrupt();
}

uint8_t Serial::interrupt_identification() const {
  if ((ier_ & kIerRxData) && !input_.empty()) return kIirRxData;
  if ((ier_ & kIerThrEmpty) && thr_empty_pending_) return kIirThrEmpty;
  return kIirNone;
}

void Serial::update_interrupt() {
  bool due;
  {
    std::lock_guard lock(mutex_);
    // OUT2 gates the interrupt line on PC serial ports.
    due = (mcr_ & kMcrOut2) && !(mcr_ & kMcrLoop) && interrupt_identification() != kIirNone;
    bool rising = due && !interrupt_asserted_;
    interrupt_asserted_ = due;
    if (!rising) return;
  }
  interrupt_();
}

size_t Serial::enqueue_input(std::span<const std::byte> bytes) {
  size_t queued = 0;
  {
    std::lock_guard lock(mutex_);
    for (std::byte b : bytes) {
      if (input_.size() >= kMaxQueuedInput) break;
      input_.push_back(static_cast<uint8_t>(b));
      ++queued;
    }
  }
  update_interrupt();
  return queued;
}

bool Serial::input_pending() const {
  std::lock_guard lock(mutex_);
  return !input_.empty();
}

SerialState Serial::save() const {
  std::lock_guard lock(mutex_);
  return SerialState{.ier = ier_,
                     .lcr = lcr_,
                     .mcr = mcr_,
                     .scr = scr_,
                     .fcr = fcr_,
                     .dll = dll_,
                     .dlm = dlm_,
                     .msr = msr_,
                     .thr_empty_pending = thr_empty_pending_,
                     .interrupt_asserted = interrupt_asserted_,
                     .input = std::vector<uint8_t>(input_.begin(), input_.end())};
}

Result<std::unique_ptr<Serial>> Serial::restore(Output output, Interrupt interrupt,
                                                const SerialState& state) {
  if (state.input.size() > kMaxQueuedInput) {
    return fail(Errc::Corrupt, fmt::format("serial state: {} queued input bytes (at most {})",
                                           state.input.size(), kMaxQueuedInput));
  }
  auto serial = std::make_unique<Serial>(std::move(output), std::move(interrupt));
  serial->ier_ = state.ier;
  serial->lcr_ = state.lcr;
  serial->mcr_ = state.mcr;
  serial->scr_ = state.scr;
  serial->fcr_ = state.fcr;
  serial->dll_ = state.dll;
  serial->dlm_ = state.dlm;
  serial->msr_ = state.msr;
  serial->thr_empty_pending_ = state.thr_empty_pending;
  serial->interrupt_asserted_ = state.interrupt_asserted;
  serial->input_.assign(state.input.begin(), state.input.end());
  return serial;
}

}  // namespace keel::devices
