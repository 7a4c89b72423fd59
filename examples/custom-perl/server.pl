#!/usr/bin/perl
# A Lambdabus function in Perl (runtime "custom"): any program that listens on $PORT and
# answers GET /healthz is a function. Perl's core only: IO::Socket::INET, no modules to install.
use strict;
use warnings;
use IO::Socket::INET;

my $port = $ENV{PORT} or die "PORT is not set\n";
my $server = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1',
    LocalPort => $port,
    Listen    => 64,
    ReuseAddr => 1,
) or die "cannot listen on port $port: $!\n";
$| = 1;
my $greeting = $ENV{GREETING} // 'Hello';
print "perl $^V listening on port $port\n";

while (my $client = $server->accept) {
    my $request = <$client>;
    next unless defined $request;
    my ($method, $path) = split / /, $request;
    my %headers;
    while (my $line = <$client>) {
        $line =~ s/\r?\n$//;
        last if $line eq '';
        my ($key, $value) = split /:\s*/, $line, 2;
        $headers{lc $key} = $value;
    }
    my $body = '';
    read($client, $body, $headers{'content-length'}) if $headers{'content-length'};

    my ($status, $type, $out);
    if ($path eq '/healthz') {
        ($status, $type, $out) = ('200 OK', 'text/plain', "ok\n");
    } else {
        my $name = $body =~ /"name"\s*:\s*"([^"\\]*)"/ ? $1 : 'world';
        print "greeting $name\n";
        ($status, $type, $out) = ('200 OK', 'application/json',
            qq({"message": "$greeting, $name!", "method": "$method", "path": "$path"}));
    }
    print $client "HTTP/1.1 $status\r\nContent-Type: $type\r\nContent-Length: "
        . length($out) . "\r\nConnection: close\r\n\r\n$out";
    close $client;
}
