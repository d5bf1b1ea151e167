import { ErrorCode, NodeKvmError } from '../kvm/errors.js';

/**
 * An image that cannot be booted as given: truncated, malformed, not fitting guest RAM, or
 * colliding with what the loader places in low memory. Thrown by planBoot() before any VM exists;
 * the message is one line that says what is wrong and where. Code ERR_BOOT_IMAGE.
 */
export class BootImageError extends NodeKvmError {
  /** An error of code ERR_BOOT_IMAGE with `message`. */
  constructor(message: string) {
    super(ErrorCode.BootImage, message);
    this.name = 'BootImageError';
  }
}

export const hex = (value: number | bigint): string => `0x${value.toString(16)}`;

/** 65536 -> '64 KiB', 67108864 -> '64 MiB', 4097 -> '4097 bytes'. */
export function formatBytes(bytes: number): string {
  const units: [number, string][] = [[1024 ** 3, 'GiB'], [1024 ** 2, 'MiB'], [1024, 'KiB']];
  for (const [size, unit] of units) if (bytes >= size && bytes % size === 0) return `${bytes / size} ${unit}`;
  return `${bytes} bytes`;
}
