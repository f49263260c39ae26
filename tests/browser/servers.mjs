// The web servers a site owner runs PHP under, for tests of the settings the site-owner guide
// gives them: real PHP-FPM behind real nginx, and real Apache with mod_php (Debian's packages),
// each on a free port of 127.0.0.1 with every file of its own in a temporary folder. Touches
// no system service and no system configuration; reads Debian's nginx fastcgi parameters and
// MIME types.
//
// A server starts with nothing of the test's environment but PATH, as a service does, so the
// only settings its PHP sees are the lines it is given. When the test runs as root, PHP runs
// as www-data (php-fpm and Apache refuse to serve as root), which must be able to read the
// document root.

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import {
  chmodSync,
  closeSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { until } from "./harness.mjs";

const AS_ROOT = process.getuid() === 0;
/** Whom PHP runs as when the test is root: Debian's web server user. */
const WEB_USER = "www-data";

/** A free TCP port on 127.0.0.1. */
export async function freePort() {
  const server = createServer().listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return port;
}

/**
 * PHP-FPM with one pool holding `poolLines` as written, behind nginx serving `docroot` and
 * passing `.php` to that pool. Answers `{ url, session(values), logs(), stop() }`.
 */
export async function phpFpm(docroot, poolLines) {
  const fpm = found("/usr/sbin", /^php-fpm[\d.]*$/, "php-fpm (Debian's php-fpm)");
  const nginx = found("/usr/sbin", /^nginx$/, "nginx (Debian's nginx)");
  const server = await Server.prepare(docroot);
  const { dir } = server;
  const socket = join(dir, "php-fpm.sock");
  writeFileSync(
    join(dir, "php-fpm.conf"),
    `[global]
pid = ${dir}/php-fpm.pid
error_log = ${dir}/php-fpm.log
daemonize = no

[site]
listen = ${socket}
pm = static
pm.max_children = 2
clear_env = yes
catch_workers_output = yes
${AS_ROOT ? `user = ${WEB_USER}\ngroup = ${WEB_USER}\n` : ""}php_admin_value[session.save_path] = ${server.sessions}
${poolLines}
`,
  );
  // One process, no workers (killing it stops nginx), every file in the server's folder.
  writeFileSync(
    join(dir, "nginx.conf"),
    `master_process off;
daemon off;
pid ${dir}/nginx.pid;
events { worker_connections 64; }
http {
    include /etc/nginx/mime.types;
    access_log ${dir}/nginx-access.log;
    client_body_temp_path ${dir}/client_body;
    proxy_temp_path ${dir}/proxy;
    fastcgi_temp_path ${dir}/fastcgi;
    uwsgi_temp_path ${dir}/uwsgi;
    scgi_temp_path ${dir}/scgi;
    server {
        listen 127.0.0.1:${server.port};
        root ${docroot};
        index index.php index.html;
        location ~ \\.php$ {
            try_files $uri =404;
            include /etc/nginx/fastcgi.conf;
            fastcgi_pass unix:${socket};
        }
    }
}
`,
  );
  server.spawn("php-fpm", fpm, ["-F", "-y", join(dir, "php-fpm.conf")]);
  server.spawn("nginx", nginx, ["-p", dir, "-c", join(dir, "nginx.conf"), "-e", "stderr"]);
  await server.ready(
    async () => (await reaches(socket)) && (await server.answers()),
    `PHP-FPM on ${socket} and nginx on ${server.url}`,
  );
  return server.handle();
}

/**
 * Apache httpd with mod_php, one process, serving `docroot` in a `<VirtualHost>` that holds
 * `vhostLines` as written. Its MIME types are Debian's without `.wasm`, as on a server whose
 * types predate it: the type a `.wasm` file gets is the one the lines give it. Answers
 * `{ url, session(values), logs(), stop() }`.
 */
export async function apacheModPhp(docroot, vhostLines) {
  const apache = found("/usr/sbin", /^apache2$/, "Apache (Debian's apache2)");
  const modules = "/usr/lib/apache2/modules";
  const php = found(modules, /^libphp[\d.]*\.so$/, "mod_php (Debian's libapache2-mod-php)");
  const server = await Server.prepare(docroot);
  const { dir } = server;
  const types = readFileSync("/etc/mime.types", "utf8")
    .split("\n")
    .filter((line) => !/\swasm\b/.test(line))
    .join("\n");
  writeFileSync(join(dir, "mime.types"), types);
  const load = (name, file) => `LoadModule ${name}_module ${modules}/${file}`;
  writeFileSync(
    join(dir, "apache2.conf"),
    `ServerRoot ${dir}
DefaultRuntimeDir ${dir}
PidFile ${dir}/apache2.pid
ErrorLog ${dir}/apache.log
ServerName 127.0.0.1
Listen 127.0.0.1:${server.port}
${load("mpm_prefork", "mod_mpm_prefork.so")}
${load("authz_core", "mod_authz_core.so")}
${load("mime", "mod_mime.so")}
${load("dir", "mod_dir.so")}
${load("env", "mod_env.so")}
LoadModule php_module ${php}
${AS_ROOT ? `User ${WEB_USER}\nGroup ${WEB_USER}\n` : ""}TypesConfig ${dir}/mime.types
DirectoryIndex index.php index.html
<FilesMatch "\\.php$">
    SetHandler application/x-httpd-php
</FilesMatch>
php_admin_value session.save_path ${server.sessions}
<Directory ${docroot}>
    Require all granted
</Directory>
<VirtualHost 127.0.0.1:${server.port}>
DocumentRoot ${docroot}
${vhostLines}
</VirtualHost>
`,
  );
  server.spawn("apache", apache, ["-X", "-f", join(dir, "apache2.conf")]);
  await server.ready(() => server.answers(), `Apache on ${server.url}`);
  return server.handle();
}

/** The file of `dir` whose name matches `name`, or a failure naming the package that has it. */
function found(dir, name, what) {
  const file = readdirSync(dir).find((entry) => name.test(entry));
  if (!file) throw new Error(`${what} is not installed: nothing in ${dir} matches ${name}; \`cargo xtask test\` installs it`);
  return join(dir, file);
}

/** Whether the unix socket at `path` takes a connection. */
function reaches(path) {
  return new Promise((answer) => {
    const socket = connect(path);
    socket.once("connect", () => {
      socket.destroy();
      answer(true);
    });
    socket.once("error", () => answer(false));
  });
}

/** The processes of one server, in one temporary folder with their logs. */
class Server {
  /** A server's folder and a free port for it; nothing runs yet. */
  static async prepare(docroot) {
    return new Server(docroot, await freePort());
  }

  constructor(docroot, port) {
    if (AS_ROOT) readableByOthers(docroot);
    this.dir = mkdtempSync(join(tmpdir(), "unified-sync-server-"));
    /** Where PHP keeps sessions, writable by PHP's user as Debian's /var/lib/php/sessions. */
    this.sessions = join(this.dir, "sessions");
    chmodSync(this.dir, 0o711);
    mkdirSync(this.sessions);
    chmodSync(this.sessions, 0o1733);
    this.port = port;
    this.children = [];
    this.killAll = () => {
      for (const { child } of this.children) {
        if (child.exitCode === null && child.signalCode === null) process.kill(-child.pid, "SIGKILL");
      }
    };
    process.once("exit", this.killAll);
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts `program` in a process group of its own, its output in `name`.log. */
  spawn(name, program, args) {
    const path = join(this.dir, `${name}.log`);
    const log = openSync(path, "a");
    const child = spawn(program, args, {
      env: { PATH: process.env.PATH },
      detached: true,
      stdio: ["ignore", log, log],
    });
    closeSync(log);
    this.children.push({ name, child, exited: once(child, "exit") });
  }

  /** Whether anything answers HTTP on the server's port. */
  async answers() {
    return (await fetch(`${this.url}/`).catch(() => null)) !== null;
  }

  /**
   * Waits (a bounded poll) until `ready` says the server answers; if it does not, or one of
   * its processes exits first, stops it and fails with its logs.
   */
  async ready(ready, what) {
    const died = Promise.race(
      this.children.map(({ name, child, exited }) =>
        exited.then(() => {
          throw new Error(`${name} exited (${child.exitCode ?? child.signalCode}) while starting`);
        }),
      ),
    );
    try {
      await Promise.race([until(ready, what), died]);
    } catch (e) {
      const logs = this.logs();
      await this.stop();
      throw new Error(`${e.message}\n${logs}`);
    }
  }

  /** Every log of the server's processes, after their configuration. */
  logs() {
    return readdirSync(this.dir)
      .filter((name) => name.endsWith(".conf") || name.endsWith(".log"))
      .sort((a, b) => Number(a.endsWith(".log")) - Number(b.endsWith(".log")))
      .map((name) => `--- ${name}\n${readFileSync(join(this.dir, name), "utf8")}`)
      .join("\n");
  }

  /**
   * A session holding `values` (strings, or integers), stored as PHP stores one (its files
   * handler, its `php` serializer) where this server's PHP keeps them: what a sign-in page
   * would have stored. Answers the Cookie header that names it.
   */
  session(values) {
    const id = randomBytes(16).toString("hex");
    const path = join(this.sessions, `sess_${id}`);
    const serialized = Object.entries(values).map(([k, v]) =>
      Number.isInteger(v) ? `${k}|i:${v};` : `${k}|s:${Buffer.byteLength(v)}:"${v}";`,
    );
    writeFileSync(path, serialized.join(""));
    // PHP opens a session file for reading and writing, as www-data when the test is root.
    chmodSync(path, 0o666);
    return `PHPSESSID=${id}`;
  }

  /** Kills every process of the server and removes its folder. */
  async stop() {
    this.killAll();
    process.removeListener("exit", this.killAll);
    await Promise.all(this.children.map(({ exited }) => exited));
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** What a test holds of a started server. */
  handle() {
    return {
      url: this.url,
      session: (values) => this.session(values),
      logs: () => this.logs(),
      stop: () => this.stop(),
    };
  }
}

/** Fails unless other users (PHP's, when the test is root) can read `docroot`. */
function readableByOthers(docroot) {
  for (let dir = resolve(docroot); ; dir = dirname(dir)) {
    const others = statSync(dir).mode & 0o007;
    const needs = dir === resolve(docroot) ? 0o005 : 0o001;
    if ((others & needs) !== needs) {
      throw new Error(`${WEB_USER}, whom PHP runs as under root, cannot read ${docroot}: ${dir} is not o+${needs === 1 ? "x" : "rx"}`);
    }
    if (dir === dirname(dir)) return;
  }
}
