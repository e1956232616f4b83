// 16550A UART (8250 family). Spec: the National Semiconductor PC16550D
// datasheet (register map, IIR priorities, LSR bits, loopback mode).
// Implemented: THR/RBR with a 64-byte receive FIFO, IER, IIR, FCR, LCR,
// MCR (loopback), LSR, MSR, SCR, the divisor latch; receive-data and
// THR-empty interrupts. Missing: modem-status and line-status interrupts,
// transmit timing (output is immediate).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "base/result.h"

#include "devices/io_handler.h"

namespace keel::devices {

// What a snapshot keeps of the UART: every register and the queued input.
struct SerialState {
  uint8_t ier = 0;
  uint8_t lcr = 0;
  uint8_t mcr = 0;
  uint8_t scr = 0;
  uint8_t fcr = 0;
  uint8_t dll = 0;
  uint8_t dlm = 0;
  uint8_t msr = 0;
  bool thr_empty_pending = false;
  bool interrupt_asserted = false;
  std::vector<uint8_t> input;  // received, not yet read by the guest
  bool operator==(const SerialState&) const = default;
};

class Serial : public IoHandler {
 public:
  // output receives each byte the guest transmits; interrupt is called to
  // pulse the UART's interrupt line (the caller raises and lowers the GSI).
  using Output = std::function<void(std::span<const std::byte>)>;
  using Interrupt = std::function<void()>;

  Serial(Output output, Interrupt interrupt)
      : output_(std::move(output)), interrupt_(std::move(interrupt)) {}

  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

  // Host input for the guest (from a terminal or socket). Bytes beyond the
  // FIFO are kept until the guest drains it; returns how many were queued.
  size_t enqueue_input(std::span<const std::byte> bytes);
  // True while the guest has not read what was queued (for back-pressure).
  bool input_pending() const;

  SerialState save() const;
  // A UART in a saved state (restore as constructor); Corrupt if the state
  // holds more input than a UART queues.
  static Result<std::unique_ptr<Serial>> restore(Output output, Interrupt interrupt,
                                                 const SerialState& state);

 private:
  uint8_t read_register(uint64_t offset);
  void write_register(uint64_t offset, uint8_t value);
  // Recomputes the interrupt identification; pulses the line if one is due.
  void update_interrupt();
  uint8_t interrupt_identification() const;

  Output output_;
  Interrupt interrupt_;
  mutable std::mutex mutex_;  // guards every register below and input_
  std::deque<uint8_t> input_;
  uint8_t ier_ = 0;
  uint8_t lcr_ = 0;
  uint8_t mcr_ = 0x08;  // OUT2: interrupts routed, as firmware leaves it
  uint8_t scr_ = 0;
  uint8_t fcr_ = 0;
  uint8_t dll_ = 0x0c;  // 9600 baud
  uint8_t dlm_ = 0;
  uint8_t msr_ = 0xb0;  // DCD, DSR, CTS
  bool thr_empty_pending_ = false;
  bool interrupt_asserted_ = false;
};

}  // namespace keel::devices
