// The `node-kvm` command's subcommands, apart from their code: the command's entry names its code
// cache after the subcommand (scripts/bundle.mjs), and only these get one of their own.

/** The subcommands, as the command's usage lists them. */
export const COMMANDS = ['run', 'migrate', 'snapshot', 'config', 'status', 'pause', 'resume', 'stop', 'reset', 'regs', 'x', 'stats', 'trace', 'info'] as const;

/** The code cache's name for a process whose first argument is `command`: a mistyped one shares 'other'. */
export function codeCacheUse(command: string | undefined): string {
  return (COMMANDS as readonly (string | undefined)[]).includes(command) ? command! : 'other';
}
