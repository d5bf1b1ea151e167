// A machine's network cards: one virtio-net device per entry of `net`, each over a TAP that the
// machine opens (by name, in a network namespace if asked) or takes from its owner (an fd).
// The guest sees only the MAC; the TAP is the host's side and a restored or received machine
// opens its own, where its configuration says.
import { closeSync } from 'node:fs';
import { defaultMac, formatMac, netModel, parseMac } from '../devices/virtio-net.js';
import type { VirtioDeviceModel } from '../devices/virtio-mmio.js';
import { argTypeError, argValueError } from '../kvm/errors.js';
import { adoptTap, MAX_TAP_NAME_BYTES, openTap } from '../kvm/tap.js';

/** A network card as the machine's configuration names it. */
export interface NetConfig {
  /** The TAP to open (created if it does not exist and the process may create interfaces). */
  tap?: string;
  /**
   * Instead of `tap`: an fd open on a TAP (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), from a
   * privileged helper say. The machine works on a duplicate; the caller keeps and closes its own.
   */
  fd?: number;
  /** With `tap`: the network namespace it is in (a file such as /run/netns/NAME). The VMM stays in its own. */
  netns?: string;
  /** The card's MAC address. Default 52:54:00:12:34:56 for the first card, ...:57 for the second, and so on. */
  mac?: string;
}

/** A card as a machine's shape records it: the guest-visible part. */
export interface NetShape {
  mac: string;
}

export type CheckedNetConfig = Omit<NetConfig, 'mac'> & { mac: string };

/** Checks a `net` configuration; returns it with the MACs filled in. */
export function checkNetConfigs(net: unknown): CheckedNetConfig[] {
  if (net === undefined) return [];
  if (!Array.isArray(net)) throw argTypeError('net must be an array of { tap | fd, netns?, mac? }');
  const checked = net.map((card: unknown, index): CheckedNetConfig => {
    if (typeof card !== 'object' || card === null) throw argTypeError(`net[${index}] must be an object`);
    const { tap, fd, netns, mac } = card as NetConfig;
    if ((tap === undefined) === (fd === undefined)) throw argTypeError(`net[${index}] needs either tap (a TAP's name) or fd (an open TAP)`);
    if (tap !== undefined && (typeof tap !== 'string' || tap === '' || Buffer.byteLength(tap) > MAX_TAP_NAME_BYTES || tap.includes('/') || tap.includes('\0'))) {
      throw argValueError(`net[${index}].tap must be an interface name of 1..${MAX_TAP_NAME_BYTES} bytes`);
    }
    if (fd !== undefined && (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff)) throw argTypeError(`net[${index}].fd must be an open fd`);
    if (netns !== undefined && (typeof netns !== 'string' || netns === '')) throw argTypeError(`net[${index}].netns must be a path`);
    if (netns !== undefined && tap === undefined) throw argValueError(`net[${index}].netns applies to tap only (an fd is open in its namespace already)`);
    if (mac !== undefined) parseMac(mac);
    return { ...(tap !== undefined ? { tap } : { fd }), ...(netns !== undefined ? { netns } : {}), mac: formatMac(parseMac(mac ?? defaultMac(index))) };
  });
  const macs = new Set(checked.map((card) => card.mac));
  if (macs.size !== checked.length) throw argValueError('net: two cards with the same MAC address');
  return checked;
}

/**
 * The cards of a saved machine (restore, migration): its MACs, on the TAPs this host was given
 * for them (required: a TAP belongs to one machine at a time).
 */
export function netConfigsFor(saved: NetShape[], given: NetConfig[] | undefined): CheckedNetConfig[] {
  if (saved.length === 0 && (given === undefined || given.length === 0)) return [];
  const cards = checkNetConfigs((given ?? []).map((card, index) => ({ ...card, mac: card?.mac ?? saved[index]?.mac })));
  if (cards.length !== saved.length) {
    throw argValueError(`the saved machine had ${saved.length} network card${saved.length === 1 ? '' : 's'}; give a TAP for each in net (got ${cards.length})`);
  }
  cards.forEach((card, index) => {
    if (card.mac !== saved[index]!.mac) throw argValueError(`net[${index}].mac ${card.mac} is not the saved card's ${saved[index]!.mac}`);
  });
  return cards;
}

/** Why a saved machine's cards do not fit a machine's, or null. */
export function netMismatch(saved: NetShape[] | undefined, mine: NetShape[] | undefined): string | null {
  const a = saved ?? [], b = mine ?? [];
  if (a.length !== b.length) return `it had ${a.length} network card${a.length === 1 ? '' : 's'}, this machine ${b.length}`;
  const index = a.findIndex((card, i) => card.mac !== b[i]!.mac);
  return index < 0 ? null : `network card ${index} had MAC ${a[index]!.mac}, this machine's ${b[index]!.mac}`;
}

export interface OpenNet {
  name: string;
  model: VirtioDeviceModel;
  data: { kind: 'net'; fd: number; tap: string };
  shape: NetShape;
  close(): void;
}

/** Opens card `index`'s TAP (on this thread, so that a missing TAP fails the machine's creation). */
export function openNet(index: number, config: CheckedNetConfig): OpenNet {
  const tap = config.fd !== undefined ? adoptTap(config.fd) : openTap(config.tap!, config.netns === undefined ? {} : { netns: config.netns });
  try {
    return {
      name: `virtio-net${index}`,
      model: netModel({ mac: config.mac }),
      data: { kind: 'net', fd: tap.fd, tap: tap.name },
      shape: { mac: config.mac },
      close: () => closeSync(tap.fd),
    };
  } catch (error) {
    closeSync(tap.fd);
    throw error;
  }
}
