// The 16550A model against the PC16550D datasheet: transmit, the divisor
// latch, scratch, loopback, receive with its interrupt, the THR-empty
// interrupt, FCR, odd access sizes, and the host input cap.
#include "devices/serial.h"

#include <array>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace keel::devices {
namespace {

// Register offsets and bits, from the datasheet.
constexpr uint64_t kRbrThr = 0;
constexpr uint64_t kIer = 1;
constexpr uint64_t kIirFcr = 2;
constexpr uint64_t kLcr = 3;
constexpr uint64_t kMcr = 4;
constexpr uint64_t kLsr = 5;
constexpr uint64_t kMsr = 6;
constexpr uint64_t kScr = 7;

constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kIerRx = 0x01;
constexpr uint8_t kIerThre = 0x02;
constexpr uint8_t kIirNone = 0x01;
constexpr uint8_t kIirThre = 0x02;
constexpr uint8_t kIirRx = 0x04;
constexpr uint8_t kMcrDtr = 0x01;
constexpr uint8_t kMcrRts = 0x02;
constexpr uint8_t kMcrOut1 = 0x04;
constexpr uint8_t kMcrOut2 = 0x08;
constexpr uint8_t kMcrLoop = 0x10;
constexpr uint8_t kLsrDataReady = 0x01;
constexpr uint8_t kLsrThre = 0x20;
constexpr uint8_t kLsrTemt = 0x40;

class SerialTest : public ::testing::Test {
 protected:
  uint8_t in(uint64_t offset) {
    std::byte value{0};
    serial_.read(offset, std::span(&value, 1));
    return static_cast<uint8_t>(value);
  }
  void out(uint64_t offset, uint8_t value) {
    std::byte byte{value};
    serial_.write(offset, std::span<const std::byte>(&byte, 1));
  }
  size_t enqueue(std::string_view text) {
    return serial_.enqueue_input(std::as_bytes(std::span(text.data(), text.size())));
  }
  std::string drain() {
    std::string text;
    while (in(kLsr) & kLsrDataReady) text.push_back(static_cast<char>(in(kRbrThr)));
    return text;
  }

  std::string output_;
  int interrupts_ = 0;
  Serial serial_{[this](std::span<const std::byte> bytes) {
                   for (std::byte b : bytes) output_.push_back(static_cast<char>(b));
                 },
                 [this] { ++interrupts_; }};
};

TEST_F(SerialTest, TransmittedBytesReachTheOutput) {
  for (char c : std::string_view("hello\n")) out(kRbrThr, static_cast<uint8_t>(c));
  EXPECT_EQ(output_, "hello\n");
  EXPECT_EQ(interrupts_, 0) << "no interrupt is enabled";
  EXPECT_EQ(in(kLsr) & (kLsrThre | kLsrTemt), kLsrThre | kLsrTemt) << "always ready to send";
}

TEST_F(SerialTest, DlabSelectsTheDivisorLatch) {
  out(kLcr, kLcrDlab | 0x03);
  EXPECT_EQ(in(kRbrThr), 0x0c) << "9600 baud at reset";
  EXPECT_EQ(in(kIer), 0x00);
  out(kRbrThr, 0x01);  // 115200 baud
  out(kIer, 0x00);
  EXPECT_EQ(in(kRbrThr), 0x01);
  out(kIer, 0x02);
  EXPECT_EQ(in(kIer), 0x02);
  EXPECT_EQ(output_, "") << "DLL writes are not transmitted";
  EXPECT_EQ(interrupts_, 0) << "DLM writes do not enable interrupts";
  EXPECT_EQ(in(kLcr), kLcrDlab | 0x03);

  out(kLcr, 0x03);
  EXPECT_EQ(in(kIer), 0x00) << "IER is separate from DLM";
  out(kRbrThr, 'x');
  EXPECT_EQ(output_, "x");
  out(kLcr, kLcrDlab | 0x03);
  EXPECT_EQ(in(kRbrThr), 0x01) << "the divisor survives";
  EXPECT_EQ(in(kIer), 0x02);
}

TEST_F(SerialTest, ScratchRegisterHoldsItsValue) {
  EXPECT_EQ(in(kScr), 0);
  out(kScr, 0x5a);
  EXPECT_EQ(in(kScr), 0x5a);
  out(kScr, 0xa5);
  EXPECT_EQ(in(kScr), 0xa5);
}

TEST_F(SerialTest, ModemStatusWithoutLoopback) {
  EXPECT_EQ(in(kMsr), 0xb0) << "DCD, DSR, CTS";
  EXPECT_EQ(in(kMcr), kMcrOut2) << "OUT2 set as firmware leaves it";
}

TEST_F(SerialTest, LoopbackMapsModemControlToModemStatus) {
  // Datasheet 8.6: DTR->DSR (bit 5), RTS->CTS (bit 4), OUT1->RI (bit 6), OUT2->DCD (bit 7).
  struct Case {
    uint8_t mcr, msr;
  };
  for (Case c : {Case{0, 0x00}, Case{kMcrDtr, 0x20}, Case{kMcrRts, 0x10}, Case{kMcrOut1, 0x40},
                 Case{kMcrOut2, 0x80}, Case{kMcrDtr | kMcrRts | kMcrOut1 | kMcrOut2, 0xf0}}) {
    out(kMcr, kMcrLoop | c.mcr);
    EXPECT_EQ(in(kMsr) & 0xf0, c.msr) << "MCR " << int(c.mcr);
  }
  EXPECT_EQ(in(kMcr), kMcrLoop | kMcrDtr | kMcrRts | kMcrOut1 | kMcrOut2);
  out(kMcr, 0xff);
  EXPECT_EQ(in(kMcr), 0x1f) << "the top three MCR bits are reserved";
}

TEST_F(SerialTest, LoopbackReturnsTransmittedDataInstead) {
  out(kMcr, kMcrLoop | kMcrOut2);
  out(kIer, kIerRx);
  for (char c : std::string_view("ab")) out(kRbrThr, static_cast<uint8_t>(c));
  EXPECT_EQ(output_, "") << "loopback data never leaves the UART";
  EXPECT_EQ(in(kLsr) & kLsrDataReady, kLsrDataReady);
  EXPECT_EQ(drain(), "ab");
  EXPECT_EQ(interrupts_, 0) << "loopback disconnects the interrupt line";
  out(kMcr, kMcrOut2);
  out(kRbrThr, 'c');
  EXPECT_EQ(output_, "c");
}

TEST_F(SerialTest, ReceivedBytesAreReadInOrder) {
  EXPECT_EQ(in(kLsr) & kLsrDataReady, 0);
  EXPECT_EQ(enqueue("abc"), 3u);
  EXPECT_TRUE(serial_.input_pending());
  EXPECT_EQ(in(kLsr) & kLsrDataReady, kLsrDataReady);
  EXPECT_EQ(in(kRbrThr), 'a');
  EXPECT_EQ(in(kRbrThr), 'b');
  EXPECT_EQ(in(kRbrThr), 'c');
  EXPECT_EQ(in(kLsr) & kLsrDataReady, 0);
  EXPECT_FALSE(serial_.input_pending());
  EXPECT_EQ(in(kRbrThr), 0) << "an empty RBR reads as 0";
  EXPECT_EQ(interrupts_, 0) << "IER is 0";
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirNone);
}

TEST_F(SerialTest, ReceiveInterruptWhenEnabled) {
  out(kIer, kIerRx);
  EXPECT_EQ(interrupts_, 0);
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirNone);
  enqueue("xy");
  EXPECT_EQ(interrupts_, 1);
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirRx);
  enqueue("z");
  EXPECT_EQ(interrupts_, 1) << "the line is still asserted: no new edge";
  EXPECT_EQ(drain(), "xyz");
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirNone);
  enqueue("w");
  EXPECT_EQ(interrupts_, 2) << "a new edge once the FIFO was drained";
}

TEST_F(SerialTest, EnablingRxInterruptWithDataPendingPulses) {
  enqueue("q");
  EXPECT_EQ(interrupts_, 0);
  out(kIer, kIerRx);
  EXPECT_EQ(interrupts_, 1);
}

TEST_F(SerialTest, InterruptNeedsOut2) {
  out(kMcr, 0);  // OUT2 clear: the IRQ line is not driven
  out(kIer, kIerRx);
  enqueue("a");
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirRx) << "the UART still identifies the source";
  EXPECT_EQ(interrupts_, 0);
  out(kMcr, kMcrOut2);
  EXPECT_EQ(interrupts_, 1) << "setting OUT2 delivers the pending interrupt";
}

TEST_F(SerialTest, ThrEmptyInterruptOnEnableClearedByReadingIir) {
  out(kIer, kIerThre);
  EXPECT_EQ(interrupts_, 1) << "the THR is empty, so enabling the interrupt raises it";
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirThre);
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirNone) << "reading IIR cleared THR-empty";
  out(kIer, kIerThre);
  EXPECT_EQ(interrupts_, 1) << "rewriting the same IER is not a new enable";
  out(kRbrThr, 'a');
  EXPECT_EQ(interrupts_, 2) << "the THR empties again after each byte";
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirThre);
  EXPECT_EQ(output_, "a");
}

TEST_F(SerialTest, ReceiveDataOutranksThrEmpty) {
  out(kIer, kIerRx | kIerThre);
  enqueue("r");
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirRx);
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirRx) << "reading IIR does not clear RX data";
  EXPECT_EQ(in(kRbrThr), 'r');
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirThre) << "THR-empty was only hidden, not cleared";
  EXPECT_EQ(in(kIirFcr) & 0x0f, kIirNone);
}

TEST_F(SerialTest, FifoControl) {
  EXPECT_EQ(in(kIirFcr) & 0xc0, 0) << "FIFOs off at reset";
  out(kIirFcr, 0x01);
  EXPECT_EQ(in(kIirFcr) & 0xc0, 0xc0) << "FIFOs enabled";
  enqueue("stale");
  out(kIirFcr, 0x03);  // enable + clear RX
  EXPECT_EQ(in(kLsr) & kLsrDataReady, 0);
  EXPECT_FALSE(serial_.input_pending());
  enqueue("new");
  EXPECT_EQ(drain(), "new");
}

TEST_F(SerialTest, WideAccessesAndHighOffsetsAreHarmless) {
  enqueue("ab");
  std::array<std::byte, 4> data{};
  serial_.read(kLsr, std::span(data).first(2));
  EXPECT_EQ(static_cast<uint8_t>(data[0]) & kLsrDataReady, kLsrDataReady);
  EXPECT_EQ(data[1], std::byte{0xff});
  serial_.read(kRbrThr, data);
  EXPECT_EQ(data[0], std::byte{'a'}) << "the low byte is the register";
  EXPECT_EQ(data[1], std::byte{0xff});
  EXPECT_EQ(data[3], std::byte{0xff});
  for (uint64_t offset : {8ull, 9ull, 0x100ull, ~0ull}) {
    serial_.read(offset, data);
    for (std::byte b : data) EXPECT_EQ(b, std::byte{0xff}) << "offset " << offset;
    std::array<std::byte, 4> junk{std::byte{'!'}, std::byte{'!'}, std::byte{'!'}, std::byte{'!'}};
    serial_.write(offset, junk);
  }
  serial_.read(kRbrThr, std::span<std::byte>());
  serial_.write(kRbrThr, std::span<const std::byte>());
  EXPECT_EQ(output_, "") << "writes at offsets >= 8 and empty writes transmit nothing";
  EXPECT_EQ(in(kScr), 0);
  EXPECT_EQ(drain(), "b");
  // A 2-byte THR write transmits its low byte only.
  std::array<std::byte, 2> word{std::byte{'o'}, std::byte{'k'}};
  serial_.write(kRbrThr, word);
  EXPECT_EQ(output_, "o");
}

TEST_F(SerialTest, LineStatusAndModemStatusAreReadOnly) {
  out(kLsr, 0x00);
  out(kMsr, 0x00);
  EXPECT_EQ(in(kLsr), kLsrThre | kLsrTemt);
  EXPECT_EQ(in(kMsr), 0xb0);
}

TEST_F(SerialTest, HostInputIsCappedAt64KiB) {
  constexpr size_t kCap = 64 * 1024;
  std::string big(kCap + 100, 'x');
  EXPECT_EQ(enqueue(big), kCap);
  EXPECT_EQ(enqueue("more"), 0u);
  EXPECT_EQ(in(kRbrThr), 'x');
  EXPECT_EQ(enqueue("yz"), 1u) << "one byte was read, so one fits";
  size_t count = 0;
  char last = 0;
  while (in(kLsr) & kLsrDataReady) {
    last = static_cast<char>(in(kRbrThr));
    ++count;
  }
  EXPECT_EQ(count, kCap);
  EXPECT_EQ(last, 'y');
}

// The shared snapshot shape: save, mutate, save differs; restore, the
// restored UART saves equal to the first save and behaves the same.
TEST_F(SerialTest, SaveAndRestoreKeepRegistersAndQueuedInput) {
  out(kLcr, 0x03);
  out(kScr, 0x5a);
  out(kIer, kIerRx);
  enqueue("abc");
  SerialState first = serial_.save();
  out(kScr, 0x11);
  ASSERT_EQ(in(kRbrThr), 'a');
  EXPECT_NE(serial_.save(), first);

  int restored_interrupts = 0;
  Result<std::unique_ptr<Serial>> restored =
      Serial::restore([](std::span<const std::byte>) {}, [&] { ++restored_interrupts; }, first);
  ASSERT_TRUE(restored) << restored.error().message();
  EXPECT_EQ((*restored)->save(), first);
  std::byte value{};
  (*restored)->read(kScr, std::span(&value, 1));
  EXPECT_EQ(value, std::byte{0x5a});
  std::string received;
  for (int i = 0; i < 3; ++i) {
    (*restored)->read(kRbrThr, std::span(&value, 1));
    received.push_back(static_cast<char>(value));
  }
  EXPECT_EQ(received, "abc");
}

TEST_F(SerialTest, RestoreRefusesMoreInputThanAUartQueues) {
  SerialState state = serial_.save();
  state.input.assign(64 * 1024 + 1, 'x');
  Result<std::unique_ptr<Serial>> restored =
      Serial::restore([](std::span<const std::byte>) {}, [] {}, state);
  ASSERT_FALSE(restored);
  EXPECT_EQ(restored.error().code(), Errc::Corrupt);
}

}  // namespace
}  // namespace keel::devices
