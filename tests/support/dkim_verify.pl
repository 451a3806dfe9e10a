#!/usr/bin/perl
# Verifies the DKIM signatures of the message on standard input with Mail::DKIM (CPAN / Debian's
# libmail-dkim-perl), an implementation independent of the dkimpy the relay signs with.
#
# Usage: dkim_verify.pl --nameserver 127.0.0.1:PORT < message
#
# Public keys are looked up over real DNS, at the tests' loopback DNS server named by --nameserver:
# Mail::DKIM::DNS::resolver() is the documented way to hand Mail::DKIM its own Net::DNS::Resolver.
# Prints one JSON object per line: first {"version": ...}, then one per DKIM-Signature header, in
# message order: {"domain", "selector", "algorithm", "result", "detail", "headers"}.
# Exit status 0 whatever the results (the test judges them); 2 on a usage error.
use strict;
use warnings;

use Getopt::Long qw(GetOptions);
use JSON::PP ();
use Mail::DKIM::DNS ();
use Mail::DKIM::Verifier ();
use Net::DNS::Resolver ();

my $nameserver = '';
GetOptions('nameserver=s' => \$nameserver) or exit 2;
my ($host, $port) = $nameserver =~ /\A(.+):(\d+)\z/ or do {
    print STDERR "usage: $0 --nameserver HOST:PORT < message\n";
    exit 2;
};

# Only the given server, no search list, no recursion wanted; short timeouts (it is on loopback).
my $resolver = Net::DNS::Resolver->new(
    nameservers => [$host], port => $port, recurse => 0, defnames => 0, dnsrch => 0,
    retry => 2, udp_timeout => 5, tcp_timeout => 5,
);
Mail::DKIM::DNS::resolver($resolver);

my $json = JSON::PP->new->canonical;
print $json->encode({ version => $Mail::DKIM::Verifier::VERSION }), "\n";

my $verifier = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    # Mail::DKIM wants CRLF line ends; the tests hand it messages as they travel over SMTP.
    $line =~ s/\015?\012\z/\015\012/;
    $verifier->PRINT($line);
}
$verifier->CLOSE();

for my $signature ($verifier->signatures) {
    next unless $signature->isa('Mail::DKIM::Signature');    # not the old DomainKeys kind
    print $json->encode({
        domain    => $signature->domain,
        selector  => $signature->selector,
        algorithm => $signature->algorithm,
        headers   => [ map { lc } $signature->headerlist ],
        result    => $signature->result,
        detail    => $signature->result_detail,
    }), "\n";
}
