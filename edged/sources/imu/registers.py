"""Register fields and bus access for I²C chips: a driver declares its register map once and reads
like the datasheet.

    class Mpu6050(RegisterDevice):
        fs_sel = Field(0x1B, bit=3, width=2)     # GYRO_CONFIG[4:3]
        fifo_reset = Bit(0x6A, 2)                # USER_CTRL[2]
        fifo_count = Word(0x72, 2, "big")        # FIFO_COUNTH:FIFO_COUNTL

    chip.fs_sel = 1                 # read-modify-write of GYRO_CONFIG, other bits kept
    chip.set_fields(fs_sel=1, ...)  # several fields of one register in one read-modify-write

`RegisterDevice` owns the bus calls: single registers through the SMBus byte calls, and FIFO
streams into one reused buffer, through a single `i2c_rdwr` transfer when the bus offers it (as
smbus2 does on Linux) or else in SMBus block reads of at most 32 bytes cut at whole frames. Bus
errors (OSError) pass through untouched: the caller decides what a failed transfer means.
"""

from __future__ import annotations

import ctypes
import errno

import numpy as np

SMBUS_BLOCK_MAX = 32  # bytes per SMBus block read (I2C_SMBUS_BLOCK_MAX in linux/i2c.h)
_I2C_M_RD = 0x0001

# An adapter without combined transfers refuses I2C_RDWR with one of these; it still does SMBus.
_RDWR_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}


class Field:
    """`width` bits starting at bit `bit` of the 8-bit register at `address`, as an unsigned int."""

    def __init__(self, address: int, bit: int = 0, width: int = 8, *, readonly: bool = False) -> None:
        if not (0 <= bit and width >= 1 and bit + width <= 8):
            raise ValueError(f"register 0x{address:02x}: bits {bit}..{bit + width - 1} do not fit a byte")
        self.address = address
        self.bit = bit
        self.width = width
        self.mask = (1 << width) - 1
        self.readonly = readonly
        self.name = f"reg_{address:02x}"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def decode(self, byte: int) -> int:
        return (byte >> self.bit) & self.mask

    def merge(self, byte: int, value: int) -> int:
        return (byte & ~(self.mask << self.bit) & 0xFF) | (value << self.bit)

    def check(self, value: int) -> int:
        value = int(value)
        if self.readonly:
            raise AttributeError(f"{self.name} is read-only")
        if not 0 <= value <= self.mask:
            raise ValueError(f"{self.name}: {value} does not fit in {self.width} bit(s)")
        return value

    def __get__(self, dev: RegisterDevice | None, owner: type | None = None):
        if dev is None:
            return self
        return self.decode(dev.read_u8(self.address))

    def __set__(self, dev: RegisterDevice, value: int) -> None:
        value = self.check(value)
        if self.width == 8:
            dev.write_u8(self.address, value)
        else:
            dev.write_u8(self.address, self.merge(dev.read_u8(self.address), value))

    def __repr__(self) -> str:
        hi = self.bit + self.width - 1
        bits = f"{hi}" if hi == self.bit else f"{hi}:{self.bit}"
        return f"<{self.name} 0x{self.address:02x}[{bits}]>"


class Bit(Field):
    """One bit of a register, read as bool."""

    def __init__(self, address: int, bit: int, *, readonly: bool = False) -> None:
        super().__init__(address, bit, 1, readonly=readonly)

    def __get__(self, dev: RegisterDevice | None, owner: type | None = None):
        if dev is None:
            return self
        return bool(super().__get__(dev, owner))


class Word:
    """An unsigned value spread over `nbytes` consecutive registers, read in one block transfer.

    `mask` keeps only the value bits when flags share the registers (e.g. a 12-bit FIFO level
    whose high byte also carries status bits)."""

    def __init__(self, address: int, nbytes: int = 2, byteorder: str = "big", mask: int | None = None) -> None:
        self.address = address
        self.nbytes = nbytes
        self.byteorder = byteorder
        self.mask = mask if mask is not None else (1 << (8 * nbytes)) - 1
        self.name = f"reg_{address:02x}"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def decode(self, raw: bytes) -> int:
        return int.from_bytes(raw, self.byteorder) & self.mask

    def __get__(self, dev: RegisterDevice | None, owner: type | None = None):
        if dev is None:
            return self
        return self.decode(dev.read_block(self.address, self.nbytes))

    def __set__(self, dev: RegisterDevice, value: int) -> None:
        raise AttributeError(f"{self.name} is read-only")


class RegisterDevice:
    """One chip at one address on one bus, with a reused buffer for FIFO streams.

    `bus` is anything with the smbus2.SMBus calls used here (`read_byte_data`, `write_byte_data`,
    `read_i2c_block_data`, optionally `i2c_rdwr`): the real bus or a fake.
    """

    def __init__(self, bus, address: int, *, stream_capacity: int = 1024) -> None:
        self.bus = bus
        self.address = address
        # ctypes memory so an i2c_rdwr read message can point straight at it: the kernel writes the
        # FIFO bytes where numpy then parses them, with no copy in between.
        self._stream = ctypes.create_string_buffer(stream_capacity)
        self._stream_view = memoryview(self._stream).cast("B")
        self._stream_np = np.frombuffer(self._stream, dtype=np.uint8)
        self._rdwr_msgs: dict[int, tuple] = {}
        self._rdwr_ok = hasattr(bus, "i2c_rdwr")

    # -- single registers ------------------------------------------------------------------
    def read_u8(self, reg: int) -> int:
        return int(self.bus.read_byte_data(self.address, reg)) & 0xFF

    def write_u8(self, reg: int, value: int) -> None:
        self.bus.write_byte_data(self.address, reg, value & 0xFF)

    def read_block(self, reg: int, n: int) -> bytes:
        """`n` ≤ 32 consecutive registers in one transfer (the chip auto-increments the address)."""
        return bytes(self.bus.read_i2c_block_data(self.address, reg, n))

    def set_fields(self, **values: int) -> None:
        """Write several fields; fields sharing a register cost one read-modify-write."""
        by_reg: dict[int, list[tuple[Field, int]]] = {}
        cls = type(self)
        for name, value in values.items():
            f = getattr(cls, name, None)
            if not isinstance(f, Field):
                raise AttributeError(f"{cls.__name__} has no register field {name!r}")
            by_reg.setdefault(f.address, []).append((f, f.check(value)))
        for reg, items in by_reg.items():
            if len(items) == 1 and items[0][0].width == 8:
                self.write_u8(reg, items[0][1])
                continue
            byte = self.read_u8(reg)
            for f, v in items:
                byte = f.merge(byte, v)
            self.write_u8(reg, byte)

    # -- streams (FIFO data registers) ---------------------------------------------------------
    @property
    def stream_capacity(self) -> int:
        return len(self._stream)

    def read_stream(self, reg: int, nbytes: int, unit: int) -> np.ndarray:
        """Read `nbytes` from a streaming data register into the reused buffer; returns a uint8 view.

        `unit` is the size of what the chip hands out whole (a FIFO frame or word): SMBus block
        reads are cut at multiples of it, since some chips restart a frame on the next transfer.
        The view is only valid until the next `read_stream`.
        """
        if nbytes > len(self._stream):
            raise ValueError(f"stream read of {nbytes} bytes exceeds the {len(self._stream)}-byte buffer")
        if nbytes > SMBUS_BLOCK_MAX and self._rdwr_ok:
            try:
                self._read_rdwr(reg, nbytes)
                return self._stream_np[:nbytes]
            except OSError as exc:
                if exc.errno not in _RDWR_UNSUPPORTED:
                    raise
                self._rdwr_ok = False  # this adapter cannot do it; SMBus blocks from now on
        chunk = max(unit, (SMBUS_BLOCK_MAX // unit) * unit)
        if chunk > SMBUS_BLOCK_MAX:
            raise ValueError(f"a {unit}-byte unit does not fit one {SMBUS_BLOCK_MAX}-byte SMBus block")
        pos = 0
        view = self._stream_view
        while pos < nbytes:
            k = min(chunk, nbytes - pos)
            view[pos:pos + k] = bytes(self.bus.read_i2c_block_data(self.address, reg, k))
            pos += k
        return self._stream_np[:nbytes]

    def _read_rdwr(self, reg: int, nbytes: int) -> None:
        msgs = self._rdwr_msgs.get(reg)
        if msgs is None:
            try:
                from smbus2 import i2c_msg  # only on a bus that offers combined transfers
            except ImportError:
                self._rdwr_ok = False
                raise OSError(errno.EOPNOTSUPP, "smbus2 not available for i2c_rdwr") from None
            write = i2c_msg.write(self.address, [reg])
            read = i2c_msg(addr=self.address, flags=_I2C_M_RD, len=0,
                           buf=ctypes.cast(self._stream, ctypes.POINTER(ctypes.c_char)))
            msgs = self._rdwr_msgs[reg] = (write, read)
        msgs[1].len = nbytes
        self.bus.i2c_rdwr(*msgs)
